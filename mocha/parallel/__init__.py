"""Process-group concerns, kept out of the model code: expert parallelism for the MoE layers
(``expert``) and the validation of a run's parallel layout (``layout``)."""
