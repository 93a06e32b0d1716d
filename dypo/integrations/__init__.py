"""Drop-in use of the fused DYPO loss inside other trainers: ``dypo.integrations.trl`` (TRL's GRPOTrainer) and
``dypo.integrations.verl`` (verl's policy-loss registry)."""
