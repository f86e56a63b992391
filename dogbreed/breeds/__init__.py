"""Breed names and labelled photos: taxonomies (ImageNet classes, class files, synonyms) and labelled folders."""
