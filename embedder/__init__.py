"""The model as a library: inputs, normalisation variants, the CNN, bundles, BN health. Imports nothing
from `training` or `service`."""
