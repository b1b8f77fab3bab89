"""The assembly: config -> parts (build), the stand-alone jobs, the launch scripts' command-line glue."""
