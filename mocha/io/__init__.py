"""Storage and on-disk layouts shared by the pipelines, training, evaluation and export:
``storage`` (local folders and ``s3://`` behind one API) and ``layout`` (every file name)."""
