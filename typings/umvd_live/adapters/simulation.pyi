from adapters.simulation import *
