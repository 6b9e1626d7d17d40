"""`squeeze gen`: the runner that turns planned jobs into images, the output-folder lock, progress, and
the identity gate (`gate`)."""
