"""Running the service in a process (`wiring.serve`); the middleware is `service.middleware`."""
