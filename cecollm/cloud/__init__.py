"""The cloud partition: the decoder layers after the upload layer, the final norm and LM head."""
