"""The model store: import any ONNX model, its metadata, preprocessing graphs, cut points.

`tierwise.models.store` needs neither numpy nor onnx (devices read it); importing models
(`tierwise.models.importer`), reading graphs (`graph`) and prepending preprocessing
(`preprocess`) need `onnx`, on the machine that imports.
"""
