"""edgedance converter: trained Keras model -> streaming TFLite model bundle (float, dynamic, int8, int16x8)."""
__version__ = "0.1.0"
