"""Ground floor: config validation (`config`), atomic file storage and readers (`storage`), run-folder locks
(`locks`), worker processes and signals (`processes`), the DDP collectives (`distributed`). Imports nothing of
studylib."""
