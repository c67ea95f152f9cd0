"""Turns DICOM series into results: classification, routing, chains, encoding, phantoms.

Nothing here opens sockets or database sessions.
"""
