"""Examples in: where they come from (sources.py: the built-in dataset,
folders, TFDS; builtin_data.py; imagenet_archives.py, the one owner of
ImageNet's archives and where they are looked for; raw_store.py, images
kept as pixels on disk or in memory), screening bad files,
the paper's preprocessing (augment.py on the host, device_preprocessing.py
on the device), the train and eval streams (stream.py), and
--mode=prepare and --mode=stats (dataset_tools.py, dataset_stats.py).
Imports runtime/, model/ and config only."""
