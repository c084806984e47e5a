"""Training data: the MNI template (fetched from nilearn's wheel), random deformations,
intensity augmentation, SynthMorph-style label maps and pair datasets."""
