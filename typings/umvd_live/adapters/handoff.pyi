from adapters.handoff import *
