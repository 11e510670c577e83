"""The image datasets (MNIST, mnist5k, Fashion-MNIST) and the teacher's (noise, image) training pairs."""
