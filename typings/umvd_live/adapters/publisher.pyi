from adapters.publisher import *
