/* placeholder; the search page replaces it */
