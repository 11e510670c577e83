"""Training loops: the teacher, the student (with its adversarial term), the image encoder, and their schedule."""
