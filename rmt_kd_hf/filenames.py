"""The names of every file and folder this package writes, in one place (readers and writers import them here)."""

# a compressed checkpoint (``save_compressed``)
REPORT_FILENAME = "rmt_kd_report.json"  # the one-shot CompressionReport
MANIFEST_FILENAME = "rmt_kd_manifest.json"  # bytes and SHA-256 of every weights file, written last
LOCK_FILENAME = ".rmt_kd.lock"  # held by the run writing into an output folder

# a compression run's output folder (``RMTKDTrainer.compress``)
HISTORY_FILENAME = "rmt_kd_history.json"  # teacher, settings, every stage and try, final sizes
SPECTRA_FILENAME = "rmt_kd_spectra.json"  # eigenvalues and MP fits of every accepted stage
SPECTRAL_REPORT_FILENAME = "spectral_report.json"  # ``rmt-kd report``
RESUME_STATE_FILENAME = "rmt_kd_resume.json"  # in a stage checkpoint: the next stage and the spectra so far
STAGE_CHECKPOINT_PREFIX = "checkpoint-stage"  # ``checkpoint-stage-<i>``
TRAINING_ARGS_JSON = "training_args.json"  # Trainer checkpoints: the arguments, instead of training_args.bin
PLOTS_DIRNAME = "spectra"  # the model card's spectrum plots

# an ONNX export folder (``export_onnx``)
ONNX_FILENAME = "model.onnx"
QUANTIZED_FILENAME = "model_quantized.onnx"
EXPORT_INFO_FILENAME = "rmt_kd_export.json"
