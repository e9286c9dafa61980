from twisted.application.service import ServiceMaker

zhiva = ServiceMaker(
    "zhiva model proxy",
    "zhiva.tap",
    "Relay AI inference requests from a DICOM viewer to model APIs through a DICOMweb PACS",
    "zhiva",
)
