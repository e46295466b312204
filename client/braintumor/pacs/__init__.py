"""Working inside the radiology workflow: read MR series from an Orthanc PACS, write results back as DICOM.

``braintumor pacs --orthanc URL`` (:mod:`braintumor.pacs.command`) runs :class:`~braintumor.pacs.worker.PacsWorker`:
it follows Orthanc's change feed (:mod:`~braintumor.pacs.orthanc`), classifies every slice of each stable MR
series through Triton with the SDK (:mod:`~braintumor.pacs.series`), and stores a Comprehensive SR and a
Secondary Capture of the Grad-CAM overlay into the same study (:mod:`~braintumor.pacs.report`); a small
SQLite file (:mod:`~braintumor.pacs.state`) makes restarts resume without repeating or losing a series.

Needs the ``pacs`` extra (highdicom, pynetdicom); the submodules are imported on use, so importing this
package costs nothing.
"""
