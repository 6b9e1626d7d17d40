"""The manifest: the file a user writes, its schema, located YAML, and its resolution into a
`LoadedManifest` (recipe merged, references found). Torch-free; every problem is reported at once."""

from .loaded import LoadedManifest, ResolvedPrompt, ResolvedSubject  # noqa: F401
from .located import Location, YamlDocument, load_yaml  # noqa: F401
from .resolve import load_manifest  # noqa: F401
from .schema import Manifest, ModelSpec, Subject  # noqa: F401
from .schema_errors import validate_schema  # noqa: F401
