"""slmkit's drop-in layers: each replaces one ``nn.Linear`` with the same call signature."""
