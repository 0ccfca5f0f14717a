# A Docker Hub pull-through cache on this host: install, configure and run the registry.
include:
  - .install
  - .config
  - .service
