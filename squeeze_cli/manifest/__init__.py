"""The manifest: the file a user writes, its schema, located YAML, and its resolution into a
`LoadedManifest` (recipe merged, references found). Torch-free; every problem is reported at once."""

from .located import Location, YamlDocument, load_yaml  # noqa: F401
from .resolve import LoadedManifest, ResolvedPrompt, ResolvedSubject, load_manifest  # noqa: F401
from .schema import Manifest, ModelSpec, Subject  # noqa: F401
from .schema_errors import validate_schema  # noqa: F401
