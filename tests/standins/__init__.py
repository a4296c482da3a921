"""Stand-ins for hypervisor tools and libraries that cannot run on this project's machines."""
