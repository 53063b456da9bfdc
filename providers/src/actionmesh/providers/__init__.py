"""actionmesh providers: the provider SDK (``actionmesh.sdk``) and example providers."""
