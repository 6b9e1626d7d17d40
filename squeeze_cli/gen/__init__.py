"""`squeeze gen`: the runner that turns planned jobs into images, the output-folder lock and progress."""
