"""Generated code for the actionmesh.v1 contract (see proto/). Do not edit by hand."""
