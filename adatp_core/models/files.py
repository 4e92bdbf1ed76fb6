"""The files of a model folder as the download, the folder check and the name resolver name them.

A leaf (it imports nothing): download.py and folder.py share these without importing each other.
"""

MARKER_FILE = "config.json"  # a folder with it is a (complete) model folder
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights never loaded: unpickling can run code
