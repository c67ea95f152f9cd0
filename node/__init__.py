"""DICOM networking and the service process: receiver, sender, workers, CLI. Never imports torch."""
