"""The engine: frames of one stream -> windows -> the UMVD network, trained online -> denoised frames."""

from umvd_live.engine.budget import CpuBudget, cpu_cores
from umvd_live.engine.changes import Change, ChangeConfig, ChangeDetector
from umvd_live.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, weights_hash
from umvd_live.engine.model import PRESETS, DenoiserUNet, ModelSpec, UMVDNet, build_model, resolve_preset
from umvd_live.engine.normalization import Normalizer, sanitize
from umvd_live.engine.priors import Prior, find_prior
from umvd_live.engine.stream import DenoisedFrame, EngineConfig, StreamDenoiser, inference_layout, pick_device
from umvd_live.engine.trainer import OnlineTrainer, ReplayBuffer, TrainerConfig
from umvd_live.engine.window import ContextHistory, SlidingWindow

__all__ = [
    "PRESETS",
    "Change",
    "ChangeConfig",
    "ChangeDetector",
    "CheckpointError",
    "ContextHistory",
    "CpuBudget",
    "DenoisedFrame",
    "DenoiserUNet",
    "EngineConfig",
    "ModelSpec",
    "Normalizer",
    "OnlineTrainer",
    "Prior",
    "ReplayBuffer",
    "SlidingWindow",
    "StreamDenoiser",
    "TrainerConfig",
    "UMVDNet",
    "build_model",
    "cpu_cores",
    "find_prior",
    "inference_layout",
    "load_checkpoint",
    "pick_device",
    "resolve_preset",
    "sanitize",
    "save_checkpoint",
    "weights_hash",
]
