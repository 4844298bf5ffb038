"""ftdoctor: diagnose and repair the dynamics of fine-tuning pretrained classifiers.

The library is the product; the ``ftdoctor`` command is a thin shell over it.
"""
__version__ = "0.1.0"
