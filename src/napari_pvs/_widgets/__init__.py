"""napari widgets: thin Qt layers over the core (see each module).

``napari.yaml`` points straight at the widget classes, so importing the package does
not load Qt.
"""
