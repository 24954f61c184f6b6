"""Built-in handlers: module rewrites and trace hooks for model families."""
