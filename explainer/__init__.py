"""llama-explainer: explain source code piece by piece, publish and translate the walkthrough."""

__version__ = "0.1.0"
