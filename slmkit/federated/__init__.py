"""Federated LoRA / QLoRA fine-tuning on Flower (``slm federate``).

``config`` (the step's options, no torch), ``launch`` (``run_federate``: simulation or
deployment), ``apps`` (the Flower ClientApp and ServerApp), ``server`` (rounds,
aggregation strategies, DP, checkpoints, output), ``local`` (a party's training round in
the one loop), ``adapters`` (the adapter every party builds and what travels of it),
``aggregate`` (FedAvg vs the exact average of LoRA products), ``split`` (clients' data).
"""
