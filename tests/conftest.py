import os

# No test may download weights: missing files must produce the "put this file there" error.
os.environ["NEVERCOLLAPSE_NO_DOWNLOAD"] = "1"
