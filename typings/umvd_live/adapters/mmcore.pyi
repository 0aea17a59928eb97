from adapters.mmcore import *
from adapters.mmcore import _quiet_adapter_search as _quiet_adapter_search
