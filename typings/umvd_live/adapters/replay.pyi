from adapters.replay import *
