"""What the controller stores: the database, its tables and migrations, the registry, the home, views."""
