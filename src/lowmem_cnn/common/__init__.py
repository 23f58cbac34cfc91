"""The ground floor: errors, reading what comes from elsewhere, writing files safely,
locks. It imports nothing else of the package."""
