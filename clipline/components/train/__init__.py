"""The train stage: snapshot -> open_clip checkpoint + MLflow run. Entry point:
``from clipline.components.train.run import train, TrainResult``."""
