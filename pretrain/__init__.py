"""The Lightning Fabric pretraining app."""
