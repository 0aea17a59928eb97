"""The engine: frames of one stream -> windows -> the UMVD network, trained online -> denoised frames."""

from umvd_live.engine.budget import CpuBudget, cpu_cores
from umvd_live.engine.changes import Change, ChangeConfig, ChangeDetector
from umvd_live.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, weights_hash
from umvd_live.engine.config import EngineConfig
from umvd_live.engine.device import CpuSeat, inference_layout, pick_device, uses_bf16
from umvd_live.engine.model import PRESETS, DenoiserUNet, ModelSpec, UMVDNet, build_model, resolve_preset
from umvd_live.engine.normalization import Normalizer, sanitize
from umvd_live.engine.outputs import BlindReferee, DenoisedFrame, RoundFailed, State
from umvd_live.engine.priors import Prior, find_prior
from umvd_live.engine.stream import StreamDenoiser
from umvd_live.engine.trainer import OnlineTrainer, ReplayBuffer, TrainerConfig
from umvd_live.engine.training import TrainingLoop
from umvd_live.engine.window import ContextHistory, SlidingWindow

__all__ = [
    "PRESETS",
    "BlindReferee",
    "Change",
    "ChangeConfig",
    "ChangeDetector",
    "CheckpointError",
    "ContextHistory",
    "CpuBudget",
    "CpuSeat",
    "DenoisedFrame",
    "DenoiserUNet",
    "EngineConfig",
    "ModelSpec",
    "Normalizer",
    "OnlineTrainer",
    "Prior",
    "ReplayBuffer",
    "RoundFailed",
    "SlidingWindow",
    "State",
    "StreamDenoiser",
    "TrainerConfig",
    "TrainingLoop",
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
    "uses_bf16",
    "weights_hash",
]
