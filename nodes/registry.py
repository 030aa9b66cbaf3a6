"""Node ids (stable forever: saved workflows refer to them) and display names."""
from .audio_clips import LoadAudioClips
from .companions import ApplyLoRA, LossGraph
from .convert_lora import ConvertLoRA
from .save_lora import SaveLoRA
from .dataset import LoadTrainingDataset, SaveTrainingDataset
from .edit_pairs import LoadEditPairs
from .train_lora import TrainLoRA
from .training_options import TrainingOptions
from .training_samples import SampleGrid, TrainingSamples
from .video_clips import LoadVideoClips

NODES = {
    "LoraTrainer_TrainLoRA": (TrainLoRA, "Train LoRA (LoRA Trainer)"),
    "LoraTrainer_SaveLoRA": (SaveLoRA, "Save LoRA (LoRA Trainer)"),
    "LoraTrainer_ApplyLoRA": (ApplyLoRA, "Apply LoRA (LoRA Trainer)"),
    "LoraTrainer_LossGraph": (LossGraph, "Loss Graph (LoRA Trainer)"),
    "LoraTrainer_SaveTrainingDataset": (SaveTrainingDataset, "Save Training Data Set (LoRA Trainer)"),
    "LoraTrainer_LoadTrainingDataset": (LoadTrainingDataset, "Load Training Data Set (LoRA Trainer)"),
    "LoraTrainer_LoadEditPairs": (LoadEditPairs, "Load Edit Pairs (LoRA Trainer)"),
    "LoraTrainer_LoadAudioClips": (LoadAudioClips, "Load Audio Clips (LoRA Trainer)"),
    "LoraTrainer_LoadVideoClips": (LoadVideoClips, "Load Video Clips (LoRA Trainer)"),
    "LoraTrainer_TrainingOptions": (TrainingOptions, "Training Options (LoRA Trainer)"),
    "LoraTrainer_ConvertLoRA": (ConvertLoRA, "Convert LoRA (LoRA Trainer)"),
    "LoraTrainer_TrainingSamples": (TrainingSamples, "Training Samples (LoRA Trainer)"),
    "LoraTrainer_SampleGrid": (SampleGrid, "Sample Grid (LoRA Trainer)"),
}
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in NODES.items()}
