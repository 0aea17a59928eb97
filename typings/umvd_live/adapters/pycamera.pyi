from adapters.pycamera import *
