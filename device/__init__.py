"""edgedance device: the Pi app (audio → fixed-point features → TFLite → MQTT)."""
