"""actionmesh providers: the provider SDK (``providers.sdk``) and example providers."""
