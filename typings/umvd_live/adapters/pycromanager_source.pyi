from adapters.pycromanager_source import *
