"""The embedded token-priority study (`tokenprio demo`): its data generator (`data`), the study pipeline
(`study`) and its task metrics (`metrics`). The core commands never import it.
"""
